// The control API's request bodies, validated at the edge with zod.
import { z } from 'zod';

export const CreateVolume = z.object({ name: z.string(), size: z.number().int().positive() });
export const ResizeVolume = z.object({ size: z.number().int().positive(), force: z.boolean().optional() });

export interface ApiErrorBody {
  error: { code: string; message: string };
}
